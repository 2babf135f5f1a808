"""Drop-in use of the kernels inside other libraries' models (one module per library).

Nothing is imported here: ``kernels.integrations.diffusers`` imports diffusers only when used.
"""
