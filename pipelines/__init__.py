"""KFP v2 pipeline definitions; `make compile` writes their YAML to pipelines/compiled/."""
