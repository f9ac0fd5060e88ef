"""Data Manager tabs: the way back from a review to Label Studio (a tab listing exactly the flagged tasks), and the
tasks a run could not pre-annotate."""

from __future__ import annotations

from .records import plain


def find_tab(client, project_id: int, title: str) -> int | None:
    """The id of the project's first tab of that title."""
    for view in client.views.list(project=project_id):
        view = plain(view)
        if (view.get("data") or {}).get("title") == title:
            return view["id"]
    return None


def save_tab(client, project_id: int, title: str, filters: dict, tab_id: int | None = None) -> int:
    """Tab `tab_id` (kept, so that links to it stay valid) or a new one, showing the tasks `filters` select."""
    data = {"title": title, "filters": filters}
    if tab_id is not None:
        return plain(client.views.update(id=tab_id, project=project_id, data=data))["id"]
    return plain(client.views.create(project=project_id, data=data))["id"]


def create_review_tab(client, project_id: int, task_ids: list[int], title: str) -> int:
    """A Data Manager tab showing only `task_ids`; an existing tab of that title is replaced. Returns its id."""
    for view in client.views.list(project=project_id):
        view = plain(view)
        if (view.get("data") or {}).get("title") == title:
            client.views.delete(id=view["id"])
    items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)} for t in task_ids]
    return save_tab(client, project_id, title, {"conjunction": "or", "items": items})


def tab_link(url: str, project_id: int, tab_id: int) -> str:
    return f"{url.rstrip('/')}/projects/{project_id}/data?tab={tab_id}"
