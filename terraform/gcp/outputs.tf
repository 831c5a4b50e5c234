output "network" {
  description = "The network whose routes cloudroutes programs."
  value       = google_compute_network.cluster.name
}

output "network_self_link" {
  value = google_compute_network.cluster.self_link
}

output "subnetwork" {
  value = google_compute_subnetwork.nodes.name
}

output "instance_names" {
  description = "Instance names of the nodes, in order; the first runs etcd."
  value       = google_compute_instance.node[*].name
}

output "internal_ips" {
  description = "Internal IPv4 addresses of the nodes, in order."
  value       = google_compute_instance.node[*].network_interface[0].network_ip
}

output "zone" {
  value = local.zone
}

output "etcd_endpoint" {
  description = "The cluster's etcd, for --etcd-endpoints from inside the network."
  value       = local.etcd_endpoint
}

output "network_config" {
  description = "The network config the first node writes to etcd once."
  value       = local.network_config
}

output "node_service_account" {
  description = "Service account holding the gce node role."
  value       = google_service_account.node.email
}

output "controller_service_account" {
  description = "Service account holding the gce controller role, or null when controller_role is false."
  value       = one(google_service_account.controller[*].email)
}
