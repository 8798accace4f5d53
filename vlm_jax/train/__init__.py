"""The training engine; it knows no technique (a technique plugs in through `extension.py`).

Read in this order: `config.py` (every key and its default), `setup.py` (shapes ->
shardings -> optimiser -> the jitted step), `init_from.py` (where the starting weights come
from), `step.py` (the pure step), `loop.py` (data, checkpoints, metrics, signals), with
`checkpoint.py` and `optim.py` beside them.
"""
