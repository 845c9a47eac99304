"""The trainer's event storage, where distillers log their own scalars beside detectron2's."""

from typing import Optional

from detectron2.utils.events import EventStorage, get_event_storage

__all__ = ["training_storage"]


def training_storage() -> Optional[EventStorage]:
    """detectron2's current ``EventStorage``; None outside a trainer (a distiller stepped by hand
    in tests or tools), where there is nothing to log to."""
    try:
        return get_event_storage()
    except AssertionError:
        return None
