from rare_ray.seeding import row_rng, row_seed


def test_row_seed_depends_on_every_part_and_nothing_else():
    assert row_seed(0, "a", "x") == row_seed(0, "a", "x")
    assert len({row_seed(0, "a"), row_seed(1, "a"), row_seed(0, "b"), row_seed(0, "a", 2)}) == 4
    assert 0 <= row_seed(7, "doc") < 2**31


def test_row_rng_is_reproducible():
    assert [row_rng(3, "r").random() for _ in range(2)] == [row_rng(3, "r").random()] * 2
