"""A study: compression experiments run as a sweep, their rows, and what the rows show.

rows (the results-row schema), sweep (grids and presets), runner (runs the cells), fits,
statistics, analysis, findings, planner (pure functions of the rows) and report (renders an
analysis). The analysis names are re-exported here; import sweep, runner and report from
their modules.
"""

from jdistill.study.analysis import (Analysis, analyze, baseline_schedule, extrapolate,
                                     hold_out_each_ratio)
from jdistill.study.findings import (EXTRAP_TOL_ABS, EXTRAP_TOL_SE, FINDING_NUMBERS, findings,
                                     summary, to_json)
from jdistill.study.fits import (HUBER_K, MIN_DOF_DECIDE, MIN_ERROR, MIN_POINTS_2D, MIN_ROW_BOOT,
                                 CurveFit, bootstrap, error_law_choice, fit_collapse, fit_error,
                                 huber_delta)
from jdistill.study.planner import plan, plan_text
from jdistill.study.rows import (STUDY_MAINS, TEACHER_MAINS, Row, Study, load_study, parse_row,
                                 select)
from jdistill.study.statistics import Z, combine, decide, paired_difference, retention_gap
