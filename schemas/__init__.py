"""Wire contracts: marshmallow schemas for ModelsLab and for motionhook's own API.

No Flask and no database here: these modules only describe shapes.
"""
