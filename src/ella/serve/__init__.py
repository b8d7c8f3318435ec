"""``ella serve``: a web app for ELLA (gradio), offline by default with the shipped shapes model.

:mod:`~ella.serve.backend` does the work (the CLI's own checks and file writing); :mod:`~ella.serve.app` lays
out the page and the ``/generate`` API. Only this command imports gradio (the ``[serve]`` extra).
"""
