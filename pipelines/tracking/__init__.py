"""MLflow: the store and its runs (`store`), rank-0 logging from workers (`logger`), the logged and registered
model (`model_logging`), figures (`plots`), and the config section MLflow reads (`settings`)."""
