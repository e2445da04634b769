from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(run: Input[Artifact], pipeline: Output[Model], ema: bool = False):
    """The run's final checkpoint → a diffusers SDXL pipeline for one-step generation (distar export). The input is
    the train step's record: the checkpoint is read from its URI, only its model weights."""
    import json

    import distar
    from distar import storage
    from distar.export import ExportConfig, export

    with open(run.path) as fh:
        record = json.load(fh)
    # evaluate and the user read the exported pipeline by this URI (a local path only under kfp.local)
    storage.check_shared("the pipeline root", pipeline.uri, local_ok=True)
    meta = export(ExportConfig(record["checkpoint"], pipeline.path, ema=ema, single_file=True))
    keys = ("checkpoint", "step", "t_star", "config_digest")
    pipeline.metadata.update({**{k: meta[k] for k in keys}, "distar_version": distar.__version__})
