from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def curate(
    sources: list,
    prompts: Output[Dataset],
    summary: Output[Markdown],
    tokenizer: str = "openai/clip-vit-large-patch14",
    max_tokens: int = 77,
    eval_fraction: float = 0.02,
    max_per_category: int = 0,
) -> int:
    """Prompt sources → curated Parquet shards (distar curate); returns the number of prompts kept."""
    import distar
    from distar.curate import CurateConfig, curate

    stats = curate(
        CurateConfig(
            sources=sources,
            out=prompts.path,
            tokenizer=tokenizer,
            max_tokens=max_tokens,
            eval_fraction=eval_fraction,
            max_per_category=max_per_category,
        )
    )
    with open(f"{prompts.path}/summary.md") as fh, open(summary.path, "w") as out:
        out.write(fh.read())
    prompts.metadata.update(
        {
            "sources": sources,
            "rows": stats["rows_out"],
            "splits": stats["splits"],
            "dropped": stats["dropped"],
            "distar_version": distar.__version__,
        }
    )
    return stats["rows_out"]
