"""Many trials (installed as `fika.search`): Ray Tune + Optuna over fika trials, and their ranked reports."""
