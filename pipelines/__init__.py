"""The DI* pipelines (kfp DSL) and their compiled YAML; a package only so that the layer contract can see them."""
