from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache(models: list, model_cache: Output[Model]):
    """Weights and prompt sets fetched, converted and checksummed into the model cache (distar cache)."""
    import distar
    from distar.cache import cache_models, parse_models, read_manifest

    status = cache_models(model_cache.path, parse_models(models))
    entries = read_manifest(model_cache.path)["entries"]
    model_cache.metadata.update(
        {
            "models": models,
            "status": status,
            "distar_version": distar.__version__,
            "sources": {k: {"source": e["source"], "revision": e["revision"]} for k, e in entries.items()},
        }
    )
