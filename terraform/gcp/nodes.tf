locals {
  zone = coalesce(var.zone, "${var.region}-b")

  # Fixed internal addresses, so every node's startup script can name the first node's etcd
  # before any instance exists (an instance's own attributes would make a dependency cycle).
  node_ips      = [for i in range(var.node_count) : cidrhost(var.subnet_cidr, var.first_node_host + i)]
  etcd_endpoint = "http://${local.node_ips[0]}:2379"

  # The gce backend finds the network, project and zone of each node in its metadata.
  network_config = jsonencode({
    Network = var.pod_network
    Backend = {
      Type        = "gce"
      Mode        = var.mode
      ClusterName = var.cluster_name
    }
  })
}

resource "google_compute_instance" "node" {
  count = var.node_count

  name         = "${var.cluster_name}-node-${count.index}"
  machine_type = var.machine_type
  zone         = local.zone
  tags         = [local.node_tag]

  # The node forwards packets for its pods' addresses, which are not its own: a route's next
  # hop instance only receives them with IP forwarding on.
  can_ip_forward = true

  # A new machine type or service account stops and restarts the node instead of failing.
  allow_stopping_for_update = true

  boot_disk {
    initialize_params {
      image = var.image
    }
  }

  network_interface {
    subnetwork = google_compute_subnetwork.nodes.id
    network_ip = local.node_ips[count.index]

    # An ephemeral external address: the node installs packages from the internet.
    access_config {}
  }

  # The agent's credentials: the node role's permissions, through the metadata server.
  service_account {
    email  = google_service_account.node.email
    scopes = ["cloud-platform"]
  }

  metadata = {
    enable-oslogin = "TRUE"
  }

  metadata_startup_script = templatefile("${path.module}/../templates/node.sh.tftpl", {
    module              = "gcp"
    boot_log            = "journalctl -u google-startup-scripts"
    cluster_name        = var.cluster_name
    node_ip             = local.node_ips[count.index]
    run_etcd            = count.index == 0
    etcd_endpoint       = local.etcd_endpoint
    network_config      = local.network_config
    cloudroutes_package = var.cloudroutes_package
    healthz_port        = var.healthz_port
    agent_unit          = file("${path.module}/../../deploy/cloudroutes.service")
    rt_protos           = file("${path.module}/../../deploy/rt_protos.conf")
  })

  # The instance must not start with permissions it does not hold yet.
  depends_on = [google_project_iam_member.node]
}
