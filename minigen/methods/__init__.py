"""Personalization methods, each built on the explicit controls of minigen/controls.py.

    residuals   Personalized Residuals and LAG sampling (Ham et al., CVPR 2024)
"""
