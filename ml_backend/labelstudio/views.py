"""Data Manager tabs: the way back from a review to Label Studio, a tab listing exactly the flagged tasks."""

from __future__ import annotations

from .records import plain


def create_review_tab(client, project_id: int, task_ids: list[int], title: str) -> int:
    """A Data Manager tab showing only `task_ids`; an existing tab of that title is replaced. Returns its id."""
    for view in client.views.list(project=project_id):
        view = plain(view)
        if (view.get("data") or {}).get("title") == title:
            client.views.delete(id=view["id"])
    items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)} for t in task_ids]
    data = {"title": title, "filters": {"conjunction": "or", "items": items}}
    return plain(client.views.create(project=project_id, data=data))["id"]


def tab_link(url: str, project_id: int, tab_id: int) -> str:
    return f"{url.rstrip('/')}/projects/{project_id}/data?tab={tab_id}"
