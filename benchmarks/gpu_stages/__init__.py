"""The stages of benchmarks/gpu_check.py, one module each (1 cuda_tests, 2 focal, 3 step_bench, 4 demo_train,
5 decode), with the shared table/budget/timing pieces in `common` and the driver in `runner`.

Imports only torch, torchvision, numpy, PIL, pytest (as a child process), triton (on CUDA) and `retina`: the GPU
machine has no Ray, MLflow or project install. Not named ``gpu_check``, which would shadow the script's module.
"""
