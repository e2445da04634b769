"""The real models' shapes without their weights (`architectures`): what `distar plan` and the benchmarks build."""
