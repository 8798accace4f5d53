"""The shapes-world demonstrations: the main job (`vila`: job `shapes_vila`) and one per technique.

Each module is a config-file job of the same name as its config under `configs/shapes/`
(`shapes_vila`, `shapes_ppl_filter`, `shapes_soups`, `shapes_sparsity`); `common` is what they share.
"""
