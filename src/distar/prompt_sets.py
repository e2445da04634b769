"""The public prompt sets of the paper's evaluation protocol, named once for every step that reads them."""

PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
"""The 1,632 Parti prompts (Apache-2.0, google-research/parti): ImageReward, aesthetic, PickScore, CLIP score."""
HPS_URL = "hf://datasets/zhwang/HPDv2/benchmark"
"""The HPSv2 benchmark prompts: one JSON list per style."""
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
"""The HPSv2 benchmark's styles; HPSv2.1 is reported per style and averaged over the four."""
