"""Serving: the stream's sessions, the micro-batched recommender, the offline reference, versions.

No Bytewax and no training code here (``tests/test_serving.py`` walks the imports): only the model,
the store and the core (settings, errors, telemetry). ``flows/`` wires these into named steps.

- :mod:`~slsrec.serving.sessions`: open sessions and their storage (what a snapshot holds);
- :mod:`~slsrec.serving.recommender`: :class:`Recommender`, the model applied to micro-batches;
- :mod:`~slsrec.serving.offline`: :func:`recommend_offline`, the reference the stream must match;
- :mod:`~slsrec.serving.versions`: following published versions, and :func:`open_recommender`.
"""

from slsrec.serving.offline import Offline, recommend_offline
from slsrec.serving.recommender import Origin, Published, Recommender, click, compute_threads, dead_letter
from slsrec.serving.sessions import Session, SessionTable
from slsrec.serving.versions import LongTermReader, load_version, open_recommender, version_run_dir

__all__ = ["LongTermReader", "Offline", "Origin", "Published", "Recommender", "Session", "SessionTable", "click",
           "compute_threads", "dead_letter", "load_version", "open_recommender", "recommend_offline", "version_run_dir"]
