"""Checks before any engine starts: the model is readable, the cluster has the GPUs."""

import pytest

from rare_ray.config import VLLMEngineConfig
from rare_ray.io.readers import InputError
from rare_ray.preflight import ClusterError, check_gpus, check_model


def test_local_model_path_must_be_readable(tmp_path, test_model):
    check_model(str(test_model))
    with pytest.raises(InputError, match="build-test-model"):
        check_model(str(tmp_path / "missing"))
    check_model("Qwen/Qwen2.5-7B-Instruct")  # a hub id is resolved on the nodes


def test_gpus_asked_for_must_exist():
    engine = VLLMEngineConfig(model="m", device="gpu", replicas=4, tensor_parallel_size=2)
    check_gpus(engine, {"CPU": 192, "GPU": 8})
    with pytest.raises(
        ClusterError, match=r"asks for 8 GPUs \(4 replicas x 2\), the cluster has 4"
    ):
        check_gpus(engine, {"CPU": 16, "GPU": 4})
    with pytest.raises(ClusterError, match="has 0"):
        check_gpus(engine, {"CPU": 2})
    check_gpus(VLLMEngineConfig(model="m", device="cpu"), {"CPU": 2})


def test_accelerator_type_must_exist():
    engine = VLLMEngineConfig(model="m", device="gpu", accelerator_type="H100")
    check_gpus(engine, {"GPU": 8, "accelerator_type:H100": 1})
    with pytest.raises(ClusterError, match=r"'H100' \(the cluster has: A10G\)"):
        check_gpus(engine, {"GPU": 8, "accelerator_type:A10G": 1})


def test_resource_check_can_be_turned_off_for_autoscaling_clusters():
    engine = VLLMEngineConfig(model="m", device="gpu", replicas=8, check_resources=False)
    check_gpus(engine, {"CPU": 4})
