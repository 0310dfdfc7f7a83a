"""Benchmark and memory-calibration harness for the worker (`finetune-bench`).

Everything here builds models from configs with random weights and generates its own data, so
it runs with no downloads; it exercises the worker's own modeling and packing code.
"""
