# The network whose routes cloudroutes programs. Terraform owns no route in it but the default
# route to the internet that Google creates with it: cloudroutes' routes are its own, outside
# the state.
resource "google_compute_network" "cluster" {
  name                    = var.cluster_name
  description             = "cloudroutes test cluster ${var.cluster_name} (gce)"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
}

resource "google_compute_subnetwork" "nodes" {
  name          = "${var.cluster_name}-nodes"
  region        = var.region
  network       = google_compute_network.cluster.id
  ip_cidr_range = var.subnet_cidr
}

locals {
  # Firewall rules apply to the nodes by this network tag.
  node_tag = "${var.cluster_name}-node"
}

resource "google_compute_firewall" "etcd" {
  name        = "${var.cluster_name}-etcd"
  description = "etcd clients (agents, controller, operators) inside the subnetwork"
  network     = google_compute_network.cluster.id
  direction   = "INGRESS"

  source_ranges = [var.subnet_cidr]
  target_tags   = [local.node_tag]

  allow {
    protocol = "tcp"
    ports    = ["2379"]
  }
}

resource "google_compute_firewall" "healthz" {
  name        = "${var.cluster_name}-healthz"
  description = "cloudroutes /healthz, /metrics and /status inside the subnetwork"
  network     = google_compute_network.cluster.id
  direction   = "INGRESS"

  source_ranges = [var.subnet_cidr]
  target_tags   = [local.node_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.healthz_port)]
  }
}

# Routed pod traffic keeps the pod's source address, so it is allowed by the pod network.
resource "google_compute_firewall" "pods" {
  name        = "${var.cluster_name}-pods"
  description = "pod-to-pod traffic routed through the network's routes"
  network     = google_compute_network.cluster.id
  direction   = "INGRESS"

  source_ranges = [var.pod_network]
  target_tags   = [local.node_tag]

  allow {
    protocol = "all"
  }
}

resource "google_compute_firewall" "nodes" {
  name        = "${var.cluster_name}-nodes"
  description = "node-to-node traffic"
  network     = google_compute_network.cluster.id
  direction   = "INGRESS"

  source_tags = [local.node_tag]
  target_tags = [local.node_tag]

  allow {
    protocol = "all"
  }
}

resource "google_compute_firewall" "ssh" {
  count = length(var.ssh_source_ranges) > 0 ? 1 : 0

  name        = "${var.cluster_name}-ssh"
  description = "SSH from ssh_source_ranges"
  network     = google_compute_network.cluster.id
  direction   = "INGRESS"

  source_ranges = var.ssh_source_ranges
  target_tags   = [local.node_tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}
