"""Local stand-ins that speak the real upstream protocols (Don't Die, Epistemic Me, OpenAI).

They are product code: the embedded default run uses them when no real upstream is
configured, and the tests use them. Everything they return is labelled as sandbox data.
"""
