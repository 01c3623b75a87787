"""``python -m peftkit.plan CASES_JSON``: ``predict_many``'s child, one process for many predictions."""

import json
import os
import sys

from ..errors import PeftkitError
from .case import Case
from .predict import predict_here

answers = []
for values in json.loads(sys.argv[1]):
    try:
        answers.append(predict_here(Case(**values)).to_dict())
    except PeftkitError as exc:
        answers.append({"error": type(exc).__name__, "message": str(exc)})
sys.stdout.write(json.dumps(answers) + "\n")
sys.stdout.flush()
os._exit(0)  # no teardown of the fake tensors (see predict_many)
