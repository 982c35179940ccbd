"""What tests of the scheduler share: a request callback that keeps every output."""

import threading


class Collector:
    """A Request's `emit`: records the outputs; `done` is set when the request finishes."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    @property
    def token_ids(self):
        return [o.token_id for o in self.outputs]
