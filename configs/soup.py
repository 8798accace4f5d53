r"""Model soups (METHODS §3) of fine-tuned checkpoints: uniform, maximum or greedy.

    python -m launch.main --config='configs/soup.py:kind=uniform,ingredients=/tmp/ft_a;/tmp/ft_b;/tmp/ft_c,output=/tmp/soup/model' --workdir=/tmp/soup
    python -m launch.main --config='configs/soup.py:kind=maximum,ingredients=/tmp/ft_a;/tmp/ft_b;/tmp/ft_c,scores=0.61;0.58;0.60,top_p=2' --workdir=/tmp/soup_max
    python -m launch.main --config='configs/soup.py:kind=greedy,evaluator=my_evals:heldout_accuracy,ingredients=/tmp/ft_a;/tmp/ft_b' --workdir=/tmp/soup_greedy --config.tie=geq
    python -m launch.main --config=configs/soup.py --config.ingredients="('/tmp/ft_a','/tmp/ft_b@200')" --workdir=/tmp/soup2

(quote the `--config=...` argument: `;` separates the paths.)

Keys:
  kind         "uniform" | "maximum" | "greedy"
  ingredients  list of paths: Orbax run / checkpoint dirs (`PATH@STEP` picks a step,
               the latest otherwise) or Hugging Face folders
               (a tuple: `--config.ingredients="('/a','/b@200')"`, or `;`-separated in the arg)
  scores       held-out scores, one per ingredient (a tuple; empty: computed with `evaluator`)
  top_p        maximum soup: "3" keeps the best 3, "0.5" or "50%" the best half (ceil)
  tie          greedy: "strict" (> needed; the original soups code) or "geq" (POINTS, >=)
  output       where the soup goes (default `<workdir>/soup`): a Hugging Face folder when the
               ingredients are Hugging Face folders, an Orbax checkpoint otherwise
               (`init="checkpoint:<output>"` starts a training stage from it)
  evaluator    "module:function", a callable `params -> float` (higher is better) on float32
               NumPy trees; needed by greedy (and by maximum when `scores` is empty)
The job prints the table (ingredient, score, accepted), writes `<workdir>/soup.json`
and saves the soup.
"""

import ml_collections

from configs import common


def _split(text: str) -> list:
  return [t.strip() for t in text.split(";") if t.strip()]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, kind="uniform", ingredients="", scores="", top_p="0.5", tie="strict",
                          output="", evaluator="")
  c = ml_collections.ConfigDict()
  c.job = "soup"
  c.seed = 0
  c.kind = args.kind
  c.ingredients = tuple(_split(args.ingredients))
  c.scores = tuple(float(s) for s in _split(args.scores))
  c.top_p = args.top_p
  c.tie = args.tie
  c.output = args.output
  c.evaluator = args.evaluator
  c.lock()
  return c
