"""The public chat widget: per-agent keys, visitor tokens, origin policy and the conversation flow.

``shared.widget.service`` is what ``functions/external/widget_chat.py`` calls; see docs/widget.md.
"""
