data "aws_ami" "debian" {
  most_recent = true
  owners      = ["136693071363"] # Debian's official AWS account

  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

locals {
  # Fixed private addresses, so every node's user data can name the first node's etcd before
  # any instance exists (an instance's own attributes would make a dependency cycle).
  node_ips      = [for i in range(var.node_count) : cidrhost(var.subnet_cidr, var.first_node_host + i)]
  etcd_endpoint = "http://${local.node_ips[0]}:2379"

  network_config = jsonencode({
    Network = var.pod_network
    Backend = {
      Type         = "aws-vpc"
      Mode         = var.mode
      RouteTableID = aws_route_table.nodes.id
      ClusterName  = var.cluster_name
    }
  })
}

resource "aws_instance" "node" {
  count = var.node_count

  ami                    = data.aws_ami.debian.id
  instance_type          = var.instance_type
  subnet_id              = aws_subnet.nodes.id
  private_ip             = local.node_ips[count.index]
  vpc_security_group_ids = [aws_security_group.nodes.id]
  iam_instance_profile   = aws_iam_instance_profile.node.name
  key_name               = var.key_name

  # The node forwards packets for its pods' addresses, which are not its own.
  source_dest_check = false

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  user_data = templatefile("${path.module}/templates/user-data.sh.tftpl", {
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
  user_data_replace_on_change = true

  tags = {
    Name = "${var.cluster_name}-node-${count.index}"
  }

  depends_on = [aws_route.internet, aws_route_table_association.nodes]
}
