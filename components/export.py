from kfp import dsl
from kfp.dsl import Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(checkpoints: Input[Model], pipeline: Output[Model], ema: bool = False):
    """The newest checkpoint → a diffusers SDXL pipeline for one-step generation (distar export)."""
    import distar
    from distar.export import ExportConfig, export

    meta = export(ExportConfig(checkpoints.path, pipeline.path, ema=ema, single_file=True))
    keys = ("checkpoint", "step", "t_star", "config_digest")
    pipeline.metadata.update({**{k: meta[k] for k in keys}, "distar_version": distar.__version__})
