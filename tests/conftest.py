"""Test set-up: 8 virtual CPU devices for sharding tests, no network, quiet libraries."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With the `tpu` extra installed, JAX would try to start a TPU runtime (and hold libtpu's lock
# file) in every test process; the tests run on CPU, and compile for TPU through launch.simulate.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


pytest_plugins = ["tests.test_train"]  # its `straight_run` fixture (one uninterrupted run) serves test_faults too
