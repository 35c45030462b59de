"""Billing: Stripe Checkout and Customer Portal sessions, and the signature-verified, exactly-once
webhook that turns Stripe's subscription state into the organization's plan, budget and limits.

Card data never reaches us: people pay on Stripe's hosted pages, and every billing request body is
searched for card-like data and refused before it is parsed (``cards.py``).
"""
