from kfp import dsl
from kfp.dsl import Artifact, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def cache(models: list, cache_root: str, model_cache: Output[Artifact]):
    """Weights and prompt sets fetched, converted and checksummed into the persistent model cache at cache_root
    (distar cache: what verifies is skipped). The output is the cache's manifest (root URI, every file's size and
    sha256, sources, revisions): later steps read the models from the root, so no step copies the cache."""
    import json

    import distar
    from distar.cache import cache_models, parse_models
    from distar.sources import read_manifest

    status = cache_models(cache_root, parse_models(models))
    manifest = read_manifest(cache_root)
    with open(model_cache.path, "w") as fh:
        json.dump({"root": cache_root, **manifest}, fh, indent=1)
    entries = manifest["entries"]
    model_cache.metadata.update(
        {
            "root": cache_root,
            "models": models,
            "status": status,
            "distar_version": distar.__version__,
            "sources": {k: {"source": e["source"], "revision": e["revision"]} for k, e in entries.items()},
        }
    )
