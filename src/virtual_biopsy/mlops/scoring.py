"""What ``mlflow models serve`` answers when the fused pyfunc refuses a request: HTTP 400, our sentence.

How MLflow 3 (3.17) turns an exception raised by ``predict`` into a response
(``mlflow/pyfunc/scoring_server/__init__.py``: ``invocations`` and ``_async_catch_mlflow_exception``):

* an exception that is not an ``MlflowException`` becomes HTTP 400 with MLflow's generic message
  ("Encountered an unexpected error while evaluating the model ...") and a ``stack_trace`` field
  holding the whole traceback, server paths included; the project's sentence is its last line;
* an ``MlflowException`` gets the status of its ``error_code`` (``INVALID_PARAMETER_VALUE``: 400)
  and the body ``serialize_as_json()``, which carries no ``stack_trace`` unless one was passed
  in. Before answering, however, the server rewrites the exception's ``message`` to
  ``"Failed to predict data '<the request as a DataFrame>'. \\nError: <message>"``, which echoes
  (truncated) image data of the request back to the caller.

No setting changes either (``MLFLOW_DISABLE_SCHEMA_DETAILS`` only shortens the messages of
MLflow's own schema enforcement). :class:`ScoringInputError` is therefore an ``MlflowException``
whose serialised body keeps the sentence it was raised with: the caller reads exactly the
project's message, the server's log still has the traceback.
"""
from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class ScoringInputError(MlflowException):
    """A request the model refuses: HTTP 400 (INVALID_PARAMETER_VALUE), ``message`` = the sentence."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence, error_code=INVALID_PARAMETER_VALUE)
        self.sentence = sentence

    def serialize_as_json(self) -> str:
        body = json.loads(super().serialize_as_json())
        body["message"] = self.sentence  # not the server's "Failed to predict data '...'" rewrite
        return json.dumps(body)


def bad_request(sentence: str) -> ScoringInputError:
    """The exception a pyfunc raises for bad input so that the scoring server answers 400 with ``sentence``."""
    return ScoringInputError(sentence)
