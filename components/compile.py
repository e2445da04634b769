"""Compile every component to the YAML that `kfp.components.load_component_from_file` loads, for Kubeflow users who
take a step without the pipeline: components/catalog/NAME/component.yaml, beside its metadata.yaml (stability, the
Kubeflow versions it needs, when it was last verified). tests/unit/test_component_catalog.py keeps both fresh.

    python components/compile.py        (DISTAR_IMAGE / DISTAR_CPU_IMAGE choose the images, as for the pipelines)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kfp import compiler  # noqa: E402

from components.baseline import baseline  # noqa: E402
from components.cache import cache  # noqa: E402
from components.compare import compare  # noqa: E402
from components.curate import curate  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.export import export  # noqa: E402
from components.train import train_local, train_trainjob  # noqa: E402

CATALOG = Path(__file__).resolve().parent / "catalog"
COMPONENTS = {
    "curate": curate,
    "cache": cache,
    "train-trainjob": train_trainjob,
    "train-local": train_local,
    "export": export,
    "evaluate": evaluate,
    "baseline": baseline,
    "compare": compare,
}


def compile_component(name: str, path: Path | None = None) -> Path:
    path = path or CATALOG / name / "component.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(COMPONENTS[name], str(path))
    return path


if __name__ == "__main__":
    for name in COMPONENTS:
        print(compile_component(name))
