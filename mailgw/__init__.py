"""mailgw: an e-mail-centric CTI gateway.

A request mail makes the PBX place a call; the PBX's events become mail. The package is laid out
one module per concept (ingress, request, routing, dispatch, pbx, notify, mailbox, store, cli).
"""

__version__ = "0.1.0"
