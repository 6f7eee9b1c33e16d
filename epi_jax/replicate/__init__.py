"""The paper's grid of runs at three scales, run to a report (``python -m epi_jax.replicate``).

``grid``: the runs each table needs; ``paper``: the paper's numbers as claims; ``measure``: the
numbers of one run; ``compare``: the two side by side; ``runner``: the runs to a report;
``cli``: the command line.
"""
