"""The GPU benchmark's parts (``bench_gpu.py``) and the one script a GPU session runs (``run.sh``)."""
