"""Few-shot adaptation of two-tower (CLIP / SigLIP) models: zero-shot, Tip-Adapter(-F), DualAdapter.

Read top to bottom: data (image folders, the shapes world) -> features (extract once, cached)
-> task (K-shot sampling; the validation split is the only one fitting sees) -> logits (the
formulas, METHODS §5) -> search (α, β, λ on validation, vmapped) -> training (residuals, a
jitted scan) -> zero_shot / tip_adapter / dual_adapter (`fit`) -> adapter (apply, save, load)
-> jobs (the `fewshot` config-file job).

    from vlm_jax import adapters
    features = adapters.extract(adapters.Encoder.from_hf("clip-folder"), adapters.image_folder("photos"),
                                cache="features.npz")
    shots = adapters.sample_shots(features, k=16, seed=0)
    adapter = adapters.dual_adapter.fit(shots, train=True)
    logits = adapter(features.splits["test"].x)
    adapter.save("dual.npz")
"""

from vlm_jax.adapters import dual_adapter, tip_adapter, zero_shot
from vlm_jax.adapters.adapter import Adapter
from vlm_jax.adapters.data import ImageDataset, LabelledImages, image_folder, shapes_world
from vlm_jax.adapters.features import CacheMismatch, Encoder, extract
from vlm_jax.adapters.search import Grid
from vlm_jax.adapters.task import Features, Shots, Split, sample_shots
from vlm_jax.adapters.training import TrainConfig
