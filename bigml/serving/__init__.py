"""bigml serve: an HTTP server for a model directory (see bigml/serving/app.py)."""
