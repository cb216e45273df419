"""``langsam label``: a labelling project (SQLite, one transaction per review action), model
proposals, review, export and the fine-tuning loop. See :class:`Project`."""

from langsam.label.project import ImageRow, ObjectRow, Project, ProjectError

__all__ = ["ImageRow", "ObjectRow", "Project", "ProjectError"]
