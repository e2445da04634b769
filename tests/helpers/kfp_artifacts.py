"""KFP artifacts as a cluster hands them to a component: a URI on the pipeline root (gs://, s3://, minio://) and a
local file, which KFP maps under /gcs, /s3, /minio and which the tests place in their own folder instead."""


def at(kind, uri: str, path: str = "/nonexistent"):
    """An artifact of class `kind` with `uri`, whose local file is `path`."""
    return type(kind.__name__, (kind,), {"_get_path": lambda self: path})(name="a", uri=uri)
