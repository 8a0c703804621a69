"""Scaling laws: the registry of laws, robust fits, bootstrap intervals and diagnostics.

Public names are re-exported from small modules, each the one home of its concept: laws (the
``LAWS`` registry), fitting, intervals (bootstrap), diagnostics, tables (rows -> columns,
published data). This package imports nothing else from jdistill.
"""

from jdistill.scaling.diagnostics import (compare_laws, diagnostics, extrapolation, huber_nll,
                                          information_criteria, r_squared, split_by)
from jdistill.scaling.fitting import (Fit, check_data, fit, fit_notebook_recipe, fit_weighted,
                                      grid_objectives, grid_starts, huber, objective_and_grad,
                                      parse_points, predict, random_starts, residuals,
                                      single_threaded_blas)
from jdistill.scaling.intervals import Bootstrap, bootstrap
from jdistill.scaling.laws import (LAWS, POWER_ERROR, Array, Law, XDict, chinchilla, collapse_law,
                                   distill_error, frantar_sparsity, get_law, gk_collapse,
                                   grouped_error_law, power_error)
from jdistill.scaling.tables import (columns, group_column, load_chinchilla_epoch, load_frantar_t5,
                                     load_frantar_vit, read_rows)
