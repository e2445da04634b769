from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare(
    evaluations: Input[list[Artifact]],
    initial: Input[Artifact],
    reference: Input[Artifact],
    report: Output[HTML],
    table: Output[Markdown],
    comparison: Output[Artifact],
    images: int = 4,
):
    """Every variant's evaluation, under one protocol, in Table 3's layout beside the paper and the baselines
    (distar compare). The inputs are the evaluations' small records; images and curves are read by URI."""
    import json
    import tempfile

    from distar import storage
    from distar.compare import compare as run_compare

    def results(record: Artifact) -> str:
        with open(record.path) as fh:
            return json.load(fh)["out"]

    with tempfile.TemporaryDirectory() as out:
        result = run_compare(
            [results(a) for a in evaluations],
            out,
            initial=results(initial),
            reference=results(reference),
            images=images,
        )
        fs, path = storage.filesystem(out)
        with open(report.path, "w") as fh:
            fh.write(fs.cat_file(f"{path}/report.html").decode())
        with open(table.path, "w") as fh:
            fh.write(fs.cat_file(f"{path}/comparison.md").decode())
    with open(comparison.path, "w") as fh:
        json.dump(result, fh, indent=1)
    comparison.metadata.update(
        {"variants": [r["variant"] for r in result["rows"]], "protocol": result["protocol_digest"]}
    )
