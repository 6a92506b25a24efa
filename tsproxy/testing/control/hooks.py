"""Operator hooks of the test control server for routes, exit nodes and node capabilities
(a mixin of TestControlServer: `self.registry` holds the state, `self.notify()` wakes every
map stream).  Call them on the server's event loop."""

from __future__ import annotations


class RouteHooks:
    def set_routes(self, node_id: int, routes) -> None:
        self.registry.set_routes(node_id, routes)
        self.notify()

    def approve_routes(self, node_id: int, prefixes) -> None:
        """An admin approves these prefixes for the node; the ones it advertises in
        Hostinfo.RoutableIPs take effect (0.0.0.0/0 or ::/0: the exit node, both)."""
        self.registry.approve_routes(node_id, prefixes)
        self.notify()

    @property
    def auto_approve_routes(self):
        """False, True (every advertised route) or a list of prefixes covering the approved."""
        return self.registry.auto_approve_routes

    @auto_approve_routes.setter
    def auto_approve_routes(self, rule) -> None:
        self.registry.auto_approve_routes = rule
        for n in self.registry.nodes.values():
            self.registry._auto_approve(n)
        self.registry._changed()
        self.notify()

    def primary_routes(self) -> dict[str, int]:
        """Subnet -> node id of its primary router."""
        return dict(self.registry.primaries)

    def set_capabilities(self, node_id: int, caps) -> None:
        """The node's legacy `Capabilities` list (clients fold it into CapMap)."""
        self.registry.nodes[node_id].capabilities = [str(c) for c in caps]
        self.registry._changed()
        self.notify()

    def set_node_attr(self, node_id: int, attr: str, value=None, on: bool = True, *,
                      peers: bool = False) -> None:
        """Add (or remove) a node attribute in the node's own CapMap, e.g. "only-tcp-443";
        with peers=True in the CapMap its peers see on it instead.  value: None or a list of
        JSON values (CapMap's []RawMessage)."""
        n = self.registry.nodes[node_id]
        attrs = n.peer_caps if peers else n.attrs
        if on:
            attrs[attr] = value
        else:
            attrs.pop(attr, None)
        self.registry._changed()
        self.notify()

    def set_exit_node(self, node_id: int, on: bool = True) -> None:
        """Make the node an approved exit node: 0.0.0.0/0 and ::/0 in its AllowedIPs."""
        keep = [r for r in self.registry.nodes[node_id].routes if not r.endswith("/0")]
        self.set_routes(node_id, keep + (["0.0.0.0/0", "::/0"] if on else []))
