"""The white-box (adaptive) evaluation behind ``python -m bench.adaptive``, one module per responsibility:

``schema``       the threats, the results table's columns, reading a results CSV back (also ``bench.frontier``'s)
``config``       the command's settings, resolved once from its arguments (``Run``)
``setting``      one (defence, target, eps) evaluation and its threats, and what a run loads (``Workload``)
``grid``         running and scoring the grid, resumably, with the costs and the test ledger
``report``       the Markdown tables, the figure and the paired comparison with the classifier alone
``sanity``       Carlini et al.'s sanity checks
``convergence``  an attack as its budget grows (margin-PGD, other losses, Square), paired
``retime``       the costs measured again
``compare``      the same settings in two results files, image by image
"""
