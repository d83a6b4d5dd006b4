"""Studies that answer a question with several runs: `reproduce_mini` (FRE->MGT vs direct MGT in miniature, the
driver behind `make reproduce-mini`), `collect` (run folders -> the study's metrics) and `report` (metrics -> markdown
and figures, a pure function)."""
