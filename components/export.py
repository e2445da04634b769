from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(
    run: Input[Artifact],
    pipeline: Output[Model],
    runs_root: str,
    run_id: str,
    task_name: str,
    ema: bool = True,
    single_file: bool = False,
    dtype: str = "fp16",
):
    """The run's final checkpoint → a diffusers pipeline for one-step generation (distar export), written by
    reference at {runs_root}/{run_id}/{task_name}[-{variant name}]. The input is the train step's record (the
    checkpoint read by URI, only its model weights); the output is the export's record: evaluate and users read the
    pipeline by the URI it names, so KFP's launcher copies kilobytes, not the model. A retry writes the same place
    again (model_index.json last, so an interrupted export is never taken for a whole one)."""
    import json

    import distar
    from distar import storage
    from distar.export import ExportConfig, export

    with open(run.path) as fh:
        record = json.load(fh)
    # a local runs_root only where everything is local (kfp.local): on a cluster, later steps could not read it
    storage.check_shared("runs_root", runs_root, local_ok=not storage.is_uri(pipeline.uri))
    out = storage.task_uri(runs_root, run_id, task_name, record.get("variant", ""))
    # ema: the EMA network whenever the run kept one (evaluate scores it beside the raw weights); False: never
    meta = export(
        ExportConfig(
            record["checkpoint"], out, ema=None if ema else False, single_file=single_file, dtype=dtype, force=True
        )
    )
    exported = {"pipeline": out, "distar_version": distar.__version__, **meta}
    with open(pipeline.path, "w") as fh:
        json.dump(exported, fh, indent=1)
    keys = ("pipeline", "checkpoint", "step", "t_star", "dtype", "config_digest", "distar_version")
    pipeline.metadata.update({k: exported[k] for k in keys})
