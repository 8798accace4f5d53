r"""Few-shot adaptation of a two-tower model (METHODS §5): zero-shot, Tip-Adapter(-F), DualAdapter(-F).

Your images and a Hugging Face CLIP or SigLIP folder (images in <root>/<class name>/*.jpg|png,
or <root>/{train,val,test}/<class name>/...):
    python -m launch.main --config='configs/fewshot.py:init=hf:/ckpt/clip-vit-base-patch32,data=folder:/data/photos' \
        --workdir=workdirs/fewshot_photos
    (the same with init=hf:/ckpt/siglip-base-patch16-224; the folder holds the model's weights,
    config.json and tokenizer files, as `save_pretrained` writes them). The image folder is
    prepared once as a TFDS data set (builders.ImageFolder) under <workdir>/tfds (config.data.data_dir)
    and reused; one folder of classes is split by seed into 60 / 20 / 20 % train / validation / test
    per class. An empty class folder, or a class with fewer images than K, is an error; an
    unreadable image is skipped and counted (fewshot.json: features.skipped).
A contrastive run of ours on the built-in shapes world (24 classes, test + 3 shifted domains):
    python -m launch.main --config='configs/fewshot.py:init=checkpoint:workdirs/shapes_vila/vision,model=shapes_vila,tokenizer=workdirs/shapes_vila/tokenizer' \
        --workdir=workdirs/fewshot_shapes
The end-to-end check on a random tiny model (seconds; what the tests run):
    python -m launch.main --config=configs/fewshot.py:quick=True --workdir=/tmp/fewshot_quick

Extracts the features once (<workdir>/features.npz, reused; a cache of another model / data is
refused), fits every method at every K and seed, searches α, β (λ) on the validation split only,
evaluates the test splits once, prints the table and writes <workdir>/fewshot.json and the
fitted adapters (<workdir>/adapters/*.npz, or Orbax folders with save_format=orbax; either
applies later: `vlm_jax.adapters.Adapter.load(path)(features)`).

Arguments: init (hf:<folder> | checkpoint:<run> | scratch), model ("" for hf:, "shapes_vila" for
the main job's contrastive stage, "tiny" for a random tiny CLIP), tokenizer (a folder; not for
hf:), data ("shapes" | "folder:<root>"), shots ("1;2;4;8;16"), seeds ("0;1;2"), noise ("0"; e.g.
"0;0.2"), methods (";"-separated of vlm_jax.adapters.jobs.METHODS), views, epochs, views_per_epoch (of the
`views` cached views, how many each shot is seen through per training epoch: 1 as the reference),
save_format ("npz" | "orbax"), quick.
"""

import ml_collections

from configs import common
from vlm_jax.train.config import default_config


def _split(text: str) -> list:
  return [t.strip() for t in text.split(";") if t.strip()]


def _model(name: str):
  if not name:
    return None
  if name == "shapes_vila":  # the two-tower model of the main job's `vision` stage
    from configs.shapes import vila
    from vlm_jax.experiments.shapes.vila import contrastive_model
    c = vila.get_config()
    return contrastive_model(c.model.vision, c.stages.vision.text.to_dict())
  if name == "tiny":  # a random tiny CLIP: the quick end-to-end check
    return ml_collections.ConfigDict(dict(
        kind="contrastive", projection_dim=32,
        vision=dict(style="clip", image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
        text=dict(style="clip", vocab_size=512, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=24,
                  pool="last")))
  raise ValueError(f"unknown model {name!r}: '' (from the hf: folder), 'shapes_vila' or 'tiny'")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, init="", model="", tokenizer="", data="shapes", shots="1;2;4;8;16", seeds="0;1;2",
                       noise="0", methods="zero_shot;tip;tip_f;dual;dual_f", views=10, epochs=20, views_per_epoch=1,
                       save_format="npz",
                       quick=False)
  q = a.quick
  c = default_config()
  c.job = "fewshot"
  c.init = a.init or ("scratch" if q else "")
  c.model = _model(a.model or ("tiny" if q else ""))
  c.tokenizer = a.tokenizer
  c.resize = ""  # the model's own processor: CLIP shorter side + centre crop, SigLIP stretch (or a preprocess mode)
  c.batch_size = 64
  c.data = ml_collections.ConfigDict(dict(
      source=a.data, seed=0, image_size=64, train=24 * 12 if q else 24 * 40, validation=96 if q else 480,
      test=96 if q else 960, domains=["standard", "outline", "palette", "noise"],
      validation_fraction=0.2, test_fraction=0.2, data_dir=""))  # data_dir "": <workdir>/tfds
  c.templates = ["a photo of a {}.", "a picture of a {}.", "a {}.", "a single {}."]
  c.negative_templates = ["a photo without {}.", "a photo of no {}."]
  c.views = 2 if q else a.views
  c.cache = ""  # default <workdir>/features.npz
  c.shots = [int(s) for s in _split("1;2" if q and a.shots == "1;2;4;8;16" else a.shots)]
  c.seeds = [int(s) for s in _split("0" if q and a.seeds == "0;1;2" else a.seeds)]
  c.noise = [float(s) for s in _split(a.noise)]
  c.methods = _split(a.methods)
  c.epochs = 2 if q else a.epochs
  c.views_per_epoch = a.views_per_epoch
  # Tip-Adapter's ranges; `geometric` lists the ones spaced geometrically (e.g. ["alpha"] for a wide α range)
  c.grid = ml_collections.ConfigDict(dict(alpha=[0.1, 5.0, 20], beta=[0.1, 7.0, 20], lam=[0.0, 1.0, 11],
                                          geometric=[]))
  c.save_adapters = True
  c.save_format = a.save_format
  return c
