"""Benchmarks of jaxaccum: step time, floor and memory on a GPT-2-shaped model.

``python benchmarks/bench_step.py --help`` lists the options.
"""
