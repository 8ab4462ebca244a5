"""The MLflow pyfunc wrapper of the tick model, so ``mlflow.pyfunc.load_model`` serves it whole
(HAR core plus XGBoost correction) to any consumer: input a frame of ``tick_features.FEATURES``,
output the log realized variance of the next 5 minutes."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

from scripts.tick.model import HarXgbModel


class TickVolatilityModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = HarXgbModel.load(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):
        return self.model.predict(model_input)
